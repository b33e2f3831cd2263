"""Harness overhead: the same BP MLP epoch (784-1024-512-256-10, batch 128, Adam) timed inside
the harness (its runner's clock) and as a bare PyTorch loop, in the same process.

    python benchmarks/bench_overhead.py [--subset 20000] [--repeats 3] [--threads 2]

Prints the fastest epoch of each (the one least disturbed by other processes, as timeit does)
and the median, and the ratio harness / bare (bar: ≤ 1.05). Runs on real MNIST when prepared
(the data make no difference to the time).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from _timing import harness_epoch_times, median


def bare_epoch_times(x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, seed: int) -> list[float]:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 1024, bias=False), torch.nn.Tanh(),
                              torch.nn.Linear(1024, 512, bias=False), torch.nn.Tanh(),
                              torch.nn.Linear(512, 256, bias=False), torch.nn.Tanh(),
                              torch.nn.Linear(256, 10, bias=False))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)  # as the harness steps
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        order = torch.randperm(len(y))
        for i in range(0, len(y), batch):
            idx = order[i:i + batch]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - start)
    return times[1:]  # the first epoch is warm-up, as in the harness


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.subset, 1, 28, 28)
    y = torch.randint(0, 10, (args.subset,))
    harness, bare = [], []
    for repeat in range(args.repeats):  # interleaved, so drift in machine load hits both
        bare += bare_epoch_times(x, y, epochs=3, batch=128, seed=repeat)
        harness += harness_epoch_times("bp", "mlp", train_subset=args.subset, epochs=3,
                                       threads=args.threads, seed=repeat)
    print(f"BP MLP epoch of {args.subset} images, batch 128, {args.threads} threads, "
          f"{len(harness)} epochs each")
    print(f"  harness     fastest {min(harness):.3f} s/epoch, median {median(harness):.3f}")
    print(f"  bare torch  fastest {min(bare):.3f} s/epoch, median {median(bare):.3f}")
    print(f"  ratio harness/bare = {min(harness) / min(bare):.3f} fastest, "
          f"{median(harness) / median(bare):.3f} median  (bar: <= 1.05)")


if __name__ == "__main__":
    main()
