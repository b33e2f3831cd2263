"""PC and DTP against BP: training seconds per epoch of the MNIST MLP (784-1024-512-256-10,
batch 128, Adam), each timed by the harness's own clock, in the same process, interleaved.

    python benchmarks/bench_pc_dtp.py [--subset 20000] [--repeats 3] [--threads 2]

Prints the median seconds per epoch of each, the ratios PC/BP and DTP/BP, and beside each its
operation-count expectation: PC's counted layer by layer (bench_roofline.macs_pc: a forward
pass, then per inference step the backward and re-prediction of the layers the error has
reached, then the weight products; BP = forward, backward, weight products); DTP = (2
forward/weight + 2 target + 3k inverse passes through the layers that have inverses) / 3 BP
passes, computed from the layer sizes.
Runs at each algorithm's default (tuned) parameters, on real MNIST when prepared, else on
random tensors of its shape (same time).
"""
from __future__ import annotations

import argparse

from _timing import interleaved_epoch_times, median

from algorithms.dtp import DTPParams  # noqa: E402  (_timing put the repository on sys.path)
from algorithms.pc import PCParams  # noqa: E402
from harness.api import Arch, Dense, Flatten  # noqa: E402

LAYERS = (784, 1024, 512, 256, 10)


def pc_count(steps: int, fixed_predictions: bool = False) -> float:
    """PC/BP by counted multiply-adds on this MLP: bench_roofline's count of what
    ``algorithms.pc.inference`` computes (checked there against torch's dispatcher)."""
    from bench_roofline import macs_bp, macs_pc
    arch = Arch("mlp", (1, 28, 28), (Flatten(),) + tuple(Dense(n) for n in LAYERS[1:-1])
                + (Dense(LAYERS[-1], "linear"),), LAYERS[-1])
    p = PCParams(inference_steps=steps, fixed_predictions=fixed_predictions)
    return macs_pc(arch, p) / macs_bp(arch, p)


def dtp_expectation(inverse_updates: int) -> float:
    sizes = [a * b for a, b in zip(LAYERS, LAYERS[1:])]
    everything, inverted = sum(sizes), sum(sizes[1:])  # g_i exists for layers 1 … L−1
    dtp = 2 * everything + 2 * inverted + 3 * inverse_updates * inverted
    return dtp / (3 * everything)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="per repeat; the first is warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    names = ("bp", "pc", "dtp")
    times = interleaved_epoch_times(names, "mlp", repeats=args.repeats, train_subset=args.subset,
                                    epochs=args.epochs, threads=args.threads, device=args.device)
    bp = median(times["bp"])
    steps, inverse_updates = PCParams().inference_steps, DTPParams().inverse_updates
    depth = len(LAYERS) - 2              # value nodes: after every weighted layer but the last
    reach = ("reaches the bottom layer" if steps >= depth
             else f"reaches {steps} of the {depth} hidden layers")
    expected = {"pc": (pc_count(steps), f"op count with T = {steps}: the error {reach}"),
                "dtp": (dtp_expectation(inverse_updates),
                        f"op count with {inverse_updates} inverse update(s) per batch")}
    print(f"MNIST MLP epoch of {args.subset} images, batch 128, Adam, "
          f"{args.threads} threads, {args.device}")
    for name in names:
        print(f"  {name:<4} {median(times[name]):.3f} s/epoch (median of {len(times[name])})")
    for name in names[1:]:
        ratio = median(times[name]) / bp
        value, how = expected[name]
        print(f"  ratio {name}/bp = {ratio:.2f}  (expected ≈ {value:.2f}: {how})")
    fixed = PCParams().fixed_predictions
    print(f"  (PC counted layer by layer on this MLP, fixed_predictions={fixed}: "
          f"{pc_count(steps, fixed):.2f}; standard PC: {pc_count(steps):.2f})")


if __name__ == "__main__":
    main()
